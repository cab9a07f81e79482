// The identity's VM role on one whole subscription named in main.bicep's vmScopes.
targetScope = 'subscription'

param principalId string
@description('Role definition GUID: Virtual Machine Contributor or the custom Run Command role (vm-role.bicep).')
param roleDefinitionGuid string

resource vmAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, roleDefinitionGuid)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleDefinitionGuid)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
