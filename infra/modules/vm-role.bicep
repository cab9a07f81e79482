// A custom role with only what enrolment needs: read and list VMs, and Run Command (v1, the
// RunShellScript action that pushes the host setup script), with its long-running-operation status.
// main.bicep deploys one per subscription named in vmScopes, assignable exactly on the vmScopes in
// that subscription (resource groups, or the subscription only when vmScopes names it), so creating
// it needs Microsoft.Authorization/roleDefinitions/write on those scopes and nowhere else.
targetScope = 'subscription'

param namePrefix string
@description('The vmScopes in this subscription (/subscriptions/<id>/resourceGroups/<rg> or /subscriptions/<id>).')
@minLength(1)
param assignableScopes array

resource runCommandRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(subscription().id, 'ezssh-vm-run-command', namePrefix)
  properties: {
    roleName: 'ezssh VM Run Command (${namePrefix}, ${subscription().subscriptionId})'
    description: 'Lets the ezssh service read VMs and push its host setup script with Run Command.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Compute/virtualMachines/read'
          'Microsoft.Compute/virtualMachines/instanceView/read'
          'Microsoft.Compute/virtualMachines/runCommand/action'
          'Microsoft.Compute/locations/operations/read'
          'Microsoft.Resources/subscriptions/resourceGroups/read'
        ]
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
