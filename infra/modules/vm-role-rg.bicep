// The custom VM role (main.bicep's runCommandActions: read VMs, Run Command and its operation
// status), for a subscription where vmScopes names only resource groups: deployed into one of them,
// assignable exactly on those resource groups. Creating it then needs rights on those resource groups
// only (role definition write, and a deployment there), none on the subscription. Its name (a GUID)
// is guid(subscription().id, 'ezssh-vm-run-command', namePrefix), as in vm-role.bicep.
targetScope = 'resourceGroup'

param namePrefix string
@description('The vmScopes in this subscription (/subscriptions/<id>/resourceGroups/<rg> or /subscriptions/<id>).')
@minLength(1)
param assignableScopes array
@description('What the role allows: runCommandActions in main.bicep.')
@minLength(1)
param actions array

resource runCommandRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, 'ezssh-vm-run-command', namePrefix)
  properties: {
    roleName: 'ezssh VM Run Command (${namePrefix}, ${subscription().subscriptionId})'
    description: 'Lets the ezssh service read VMs and push its host setup script with Run Command.'
    type: 'CustomRole'
    permissions: [
      {
        actions: actions
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
    assignableScopes: assignableScopes
  }
}

output roleGuid string = runCommandRole.name
output roleDefinitionId string = runCommandRole.id
