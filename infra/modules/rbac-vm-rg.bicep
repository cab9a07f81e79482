// The identity's VM role on one resource group named in main.bicep's vmScopes.
targetScope = 'resourceGroup'

param principalId string
@description('Role definition GUID: Virtual Machine Contributor or the custom Run Command role (vm-role.bicep).')
param roleDefinitionGuid string

resource vmAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, principalId, roleDefinitionGuid)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleDefinitionGuid)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
